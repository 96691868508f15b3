"""Security: client identity (Ed25519 keys and their registry in the store), signed updates, scoped invocation
tokens."""
