"""What ``EWC`` stores: tasks (θ* plus blocks), their online folding, and the saved-state format."""
