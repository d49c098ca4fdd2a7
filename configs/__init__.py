"""Python config files; each defines `config = TrainConfig(...)`."""
