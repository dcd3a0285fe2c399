"""Host side: the adapter directory, validation, the pinned host cache, and vLLM's resolver."""
