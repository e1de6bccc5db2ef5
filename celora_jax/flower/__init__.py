"""celora-jax methods as a Flower application (``pip install celora-jax[flower]``, flwr 1.42).

- ``client_app.make_client_app(config)``: the ClientApp; one SuperNode per client.
- ``server_app.CeloraStrategy`` / ``make_server_app``: the method's server as a Strategy on
  Flower's Message API, sending each node its own download.
- ``records``: pytrees in Flower records by key path.
- ``app``: the ``server_app`` and ``client_app`` that ``flwr run`` starts, configured from
  Flower's run config; ``app_dir.write_app`` (``celora-jax flower-app DIR``) writes the app
  directory. Docs page "Deploying with Flower".

The nodes compute what the simulator computes for their client
(``celora_jax.federated.nodes``, ``celora_jax.federated.server_node``).
"""
