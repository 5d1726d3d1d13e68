"""Generation-based VQA evaluation."""
