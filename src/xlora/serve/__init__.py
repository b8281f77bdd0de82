"""The OpenAI-compatible server: request checks, the batching engine, the HTTP app."""
