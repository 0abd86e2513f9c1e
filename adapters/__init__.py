"""VLM adapters (installed as ``jsae.adapters``): everything model-specific lives here."""
