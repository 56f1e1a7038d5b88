"""shmserve client."""
