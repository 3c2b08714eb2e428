"""Where model files come from: each module in this package has a ``fetch(...)`` function that
brings one kind of source (TF Hub, Kaggle Hub, a URL, a local directory) to the local disk."""
