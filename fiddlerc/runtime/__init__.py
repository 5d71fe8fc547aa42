"""What the generated module and the loaded model call at run time."""
