pytest_plugins = ["pool_fixtures", "mergekit_fixtures"]
