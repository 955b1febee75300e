"""Model workers: one process per loaded model, and the server-side proxy that drives it."""
