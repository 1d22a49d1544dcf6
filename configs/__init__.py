"""Packaged YAML configs (this folder is installed as anomaly_diffusion.configs)."""
