//! Honest-but-curious adversary: gradient-inversion attacks on intercepted updates, scoring, pictures.
