"""What the two training scripts share that is not the lesson: see each module's docstring."""
