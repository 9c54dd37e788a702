"""Remote: SSH connections, pushing the dashboard over SFTP, pulling it with watch."""
