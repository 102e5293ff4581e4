"""Train state, pure steps, the stage loop and the recipes built on them."""
