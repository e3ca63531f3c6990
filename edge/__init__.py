"""Device knowledge: profiles, Modbus decoding, read planning, the cell model and the site simulator."""
