"""Worker processes: one model instance each."""
