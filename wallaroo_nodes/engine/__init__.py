"""The Wallaroo engine: model, protocols, decoding and weights; knows nothing of any front end."""
