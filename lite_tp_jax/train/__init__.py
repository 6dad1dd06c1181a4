"""Training: the compiled step, the loop behind ``lite-tp train``, batches and
failure injection."""
