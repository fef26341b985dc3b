"""Privacy gate and data-protection machinery. Knows nothing of Ray or HTTP."""
