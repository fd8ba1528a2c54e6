"""The X-SAM model as a library: encoders, projectors, connector, Mask2Former-style decoder with
latent background, losses, visual prompts, post-processing. No Ray inside."""
