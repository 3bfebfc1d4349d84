"""Files: the one place model-directory files are opened (`confine`), tensor readers, the writer of the output
shards, the staged output directory and the lock file."""
