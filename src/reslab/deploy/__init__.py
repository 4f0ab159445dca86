"""reslab.deploy"""
