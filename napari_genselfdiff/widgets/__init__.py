"""The three dock widgets: Pretrain, Fine-tune, Segment."""
