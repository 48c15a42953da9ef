"""fedlm on Flower's deployment engine (`pip install fedlm[flower]`): a ServerApp that runs fedlm's
round loop (`server_app`), a ClientApp for SuperNodes (`client_app`), the transport between them
(`transport`, `records`), and launching runs (`launch`, `flower_app`, `certs`, `local_deployment`)."""
