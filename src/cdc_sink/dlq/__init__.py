"""Dead letters: what they hold, the DLQ limit and producer, and their replay."""
