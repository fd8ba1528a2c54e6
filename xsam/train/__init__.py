"""Training-side data handling: per-read formatting of stored samples and augmentation."""
