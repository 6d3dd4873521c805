"""gactor: a Garden-compatible Linux container server and its trio client."""
