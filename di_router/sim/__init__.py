"""A vLLM 0.7.2 (Neuron fork) simulator: same CLI, wire format and KV pairing, modelled timing."""
