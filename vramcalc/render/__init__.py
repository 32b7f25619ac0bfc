"""Everything people read: text tables, files, reports and plots (no estimates made here)."""
