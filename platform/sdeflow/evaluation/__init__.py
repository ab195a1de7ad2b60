"""Evaluating a trained model: the loop over a split, sample quality (the Metric interface, SWD, MMD,
FID, KID), Inception features, and figures."""
