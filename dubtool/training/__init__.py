"""Training: data preparation, the autoencoder, and the joint dubbing model."""
