"""Training: the explicit loops of the DDPM and the classifier (`loops`), and both phases as one
resumable job with checkpoints and the model bundle (`job`). The `adiff train` command is `usecases/train.py`."""
