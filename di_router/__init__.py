"""di-router: disaggregated-inference router for vLLM on AWS Trainium, and its vLLM simulator."""

__version__ = "0.1.0"
