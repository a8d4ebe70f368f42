"""socksflow's standard plugins, installed as ``socksflow_plugins`` and loaded through entry points."""
