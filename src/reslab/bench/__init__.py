"""reslab.bench"""
