"""Everything that talks to the Hugging Face Hub: fetching parents, their metadata, publishing."""
