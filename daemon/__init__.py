"""shmserve supervisor daemon."""
