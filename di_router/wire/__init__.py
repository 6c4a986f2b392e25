"""The OpenAI/vLLM wire format shared by the router and the simulator."""
