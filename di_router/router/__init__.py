"""The DI router: one OpenAI-compatible endpoint in front of a prefill and a decode vLLM server."""
