"""Shipped profiles; installed as the package `mmpl_cli.profile_files` so they are found after `pip install`."""
