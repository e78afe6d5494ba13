"""Classification metrics (scikit-learn), the radial-profile baseline, and figures."""
