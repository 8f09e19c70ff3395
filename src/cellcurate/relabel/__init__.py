"""Per-nucleus features, cross-validated classifiers, relabeling rounds, issue detection, reports."""
