"""Registers the `packaging` marker, so `pytest -m "not packaging"` skips the package builds and installs."""


def pytest_configure(config):
    config.addinivalue_line("markers", "packaging: builds the .deb and .rpm; installs the .deb when run as root")
