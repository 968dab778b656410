"""From a trained run to what a robot runs elsewhere: merging an adapter into its base (LeRobot's format), model
cards and pushing to the Hugging Face Hub."""
