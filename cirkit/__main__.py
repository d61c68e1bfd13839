"""`python -m cirkit` (and `accelerate launch -m cirkit train ...`) runs the CLI."""

from cirkit.cli import app

if __name__ == "__main__":
    app(prog_name="cirkit")
