"""Programs the tests start as processes (alone or under torchrun), named by what they run:
train_save_params (one training run; saves the final parameters), train_in_sequence (several runs in one
process), train_indefinite_gram (a run whose Gram matrices are made indefinite), gram_allreduce (the Gram
sums of several processes all-reduced by NewtonMuon.refresh_gram), kill_driver (the trainer's command,
killed at a step or during a save: tests/test_resume.py)."""
