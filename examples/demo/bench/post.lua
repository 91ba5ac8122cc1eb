-- wrk script: every request creates a new user (POST /users with a fresh JSON body).
counter = 0
request = function()
  counter = counter + 1
  local name = "u" .. math.random(1, 1000000000) .. "-" .. counter
  local body = '{"name":"' .. name .. '","email":"' .. name .. '@example.com"}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
