"""The object format: updates (read, verify), the writer, round specs and manifests, store keys."""
