"""Training: one generic loop (accelerate) and a plugin per trainable backbone."""
