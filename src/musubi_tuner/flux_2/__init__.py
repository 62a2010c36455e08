"""FLUX.2 (dev and klein): model, VAE and text-encoder wrappers, caching, training hooks, sampling, generator."""
