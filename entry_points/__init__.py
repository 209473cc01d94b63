"""carclf pipeline steps: preprocess, augment, train, evaluate, deploy, score."""
