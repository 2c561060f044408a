"""Networks: configs, landmark completion, autoencoder, appearance encoder, denoiser, sampling."""
